from services.quotes.main import main

main()
