"""Read-only HTTP views on a worker: ``GET /users/<id>`` (what ``promo user show`` prints) and
``GET /decisions/<id>?user=<user id>`` (what ``promo explain`` prints), from the running engine's own state.

Off by default: they exist only when ``PROMO_HTTP_VIEWS_TOKEN`` is set, and every request must carry it as
``Authorization: Bearer <token>`` (401 otherwise). They hold personal data, so keep the web port
(``PROMO_WEB_HOST``) on a private network even then. A view reads Redis asynchronously with the store's
timeouts and never writes, so it cannot block or change the batch loop.
"""

from __future__ import annotations

import hmac

from stream.settings import Settings

__all__ = ["register_http_views"]


def register_http_views(app, settings: Settings, state: dict) -> bool:
    """Add the views to the Faust ``app`` when a token is set; returns whether they were added. ``state["engine"]``
    is the worker's engine (set once it is built)."""
    if settings.http_views_token is None:
        return False
    from stream.forget import engine_user_id
    from stream.views import EngineViews

    token = settings.http_views_token.get_secret_value().encode()

    def views() -> EngineViews:
        return EngineViews(state["engine"], user_key=lambda u: engine_user_id(settings, u))

    def refused(web, request):
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), b"Bearer " + token):
            return None
        return web.json({"error": "give the token of PROMO_HTTP_VIEWS_TOKEN as 'Authorization: Bearer <token>'"},
                        status=401)

    @app.page("/users/{user_id}")
    async def user_view(web, request, user_id):
        if (denied := refused(web, request)) is not None:
            return denied
        out = await views().user(user_id)
        return web.json(out, status=200 if out["found"] else 404)

    @app.page("/decisions/{decision_id}")
    async def decision_view(web, request, decision_id):
        if (denied := refused(web, request)) is not None:
            return denied
        user = request.query.get("user")
        if not user:
            return web.json({"error": "give the decision's user as ?user=<user id> (its key in the decisions "
                                      "topic)"}, status=400)
        out = await views().explain(decision_id, user)
        if out is None:
            return web.json({"error": f"the engine holds no decision {decision_id} for this user"}, status=404)
        return web.json(out)

    return True
