from models.state.engine_memory import MemoryStore
from tests.store_contract import EngineStoreContract


class TestMemoryStore(EngineStoreContract):
    def make_store(self):
        return MemoryStore()
