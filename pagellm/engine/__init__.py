"""The engine: the only room that sees both requests' text and KV blocks."""
