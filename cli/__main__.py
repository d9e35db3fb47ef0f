from dstack.cli.main import main

main()
