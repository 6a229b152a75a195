"""HTTP routes, one module per area; each validates, calls one service function, shapes the response."""
