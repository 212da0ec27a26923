from mlecs.cli import main

main()
