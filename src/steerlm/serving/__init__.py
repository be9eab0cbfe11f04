"""The pieces of `steerlm serve`, one module per concern; the stage itself (settings, routes and `main`) is
`steerlm/serve.py`:

    schemas  the request bodies (OpenAI, NeMo, scoring), the error shape, request parsing, response pieces
    guard    the middleware in front of the routes (API key, body size, content type) and the metrics
    service  requests -> prompts, sampling and engine rows; collecting and streaming their results
"""
