from services.witness.main import main

main()
