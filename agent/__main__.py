from dstack.agent.main import main

main()
