"""The HTTP gateway (`charging serve`): the original service's two endpoints, a REST API for
callers that must not hold Redis credentials, and a live page. A Starlette app on the
asyncio producer (docs/http-api.md); needs the [http] extra."""
