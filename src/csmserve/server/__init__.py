"""The rule every route shares, below the API packages and without their message types: the socket
(:mod:`.ws`), the HTTP streaming rule (:mod:`.streaming`), admission, the typed state, errors' base
shape, auth, the guard, serving, the watchdog; plus the routes that are no API's (health, the demo page)."""
