"""An OpenAI-compatible chat-completions server for a trained run (`mmbridge serve RUN_DIR`).

`request.py` reads an OpenAI request into conversation turns, images and sampling settings; `text.py` turns
decoded tokens into the reply text (streamed in settled pieces, cut at stop strings); `engine.py` runs
generation on one thread, batching the requests that wait; `guard.py` checks what a request must pass before it
is read (host, API key, content type, size, room); `app.py` is the FastAPI app.
"""
