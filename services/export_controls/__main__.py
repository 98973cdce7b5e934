from services.export_controls.main import main

main()
