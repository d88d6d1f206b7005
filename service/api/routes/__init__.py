"""The API's routers; ``service.app.create_app`` includes each."""
