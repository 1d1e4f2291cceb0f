from nexuscore.cli import main

main()
