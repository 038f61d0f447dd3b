"""The adversary: what the curious cloud records, and the attacks it runs on it."""
