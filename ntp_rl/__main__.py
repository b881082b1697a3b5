from ntp_rl.cli import main

main()
