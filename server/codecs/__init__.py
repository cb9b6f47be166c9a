"""Wire formats: decode requests into `server.types`, encode responses back. Nothing else parses them."""
