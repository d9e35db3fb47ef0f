from dstack.coordinator.main import main

main()
