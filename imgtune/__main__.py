from imgtune.cli import main

main()
