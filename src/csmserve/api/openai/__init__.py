"""OpenAI's speech API: the request body (:mod:`.messages`) and the routes (:mod:`.routes`). Never imports torch."""
