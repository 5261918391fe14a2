from spectrumd.cli.main import main

main()
