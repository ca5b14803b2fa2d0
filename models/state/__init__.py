"""Where the engine keeps its state: interfaces and their in-memory and Redis implementations.

* :mod:`models.state.engine_store` - users' profiles, de-duplication markers, decisions, the open-decision index,
  the shared policy hash and the event-time clock (:class:`~models.state.engine_store.EngineStore`);
* :mod:`models.state.item_store` - item statistics: counts, neighbours, popularity
  (:class:`~models.state.item_store.ItemStore`);
* :mod:`models.state.budget_store` - campaign budgets: reservations, settlements, the ledger
  (:class:`~models.state.budget_store.BudgetStore`);
* ``lua/`` - the Redis scripts (:func:`models.state.scripts.lua`).
"""
