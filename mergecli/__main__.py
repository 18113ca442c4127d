from mergecli.entry import main

main()
