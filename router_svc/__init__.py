"""Router service: top-1 routing, dispatch of token rows to expert workers, combine."""
