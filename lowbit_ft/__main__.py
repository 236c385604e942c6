from lowbit_ft.cli import main

main()
