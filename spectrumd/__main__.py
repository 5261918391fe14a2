from spectrumd.daemon.main import main

main()
