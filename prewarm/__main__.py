from prewarm.cli import main

main()
