"""The runtime every service uses: consumer, outbox, service composition, database, settings,
health and observability. Imports the contract only."""
