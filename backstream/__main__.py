from backstream.cli import main

main()
