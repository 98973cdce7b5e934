from services.deliveries.main import main

main()
