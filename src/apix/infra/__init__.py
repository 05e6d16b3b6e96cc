"""Infrastructure: database engines and transactions, Redis, embedded servers, migrations."""
