from carctl.cli import main

main()
