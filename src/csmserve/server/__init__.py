"""HTTP and WebSocket adapters over the session and engine layers."""
