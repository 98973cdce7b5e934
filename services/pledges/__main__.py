from services.pledges.main import main

main()
