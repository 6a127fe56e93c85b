from maskscope.cli import main

main()
