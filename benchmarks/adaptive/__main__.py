from benchmarks.adaptive.run import main

main()
