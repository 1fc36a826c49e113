from kata.shim.main import main

main()
