from dstack.cli.quick import main

main()
