"""`moefleet loadtest`: bounded load against any OpenAI-compatible endpoint, with clients that vanish.

plan.py decides what to send (pure, seeded), client.py sends it and times it, report.py summarises it
(percentiles, throughput, hung / lost / error counts), command.py is the CLI.
"""
