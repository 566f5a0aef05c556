import pytest

from tests.distributed.harness import World


def _world(n):
    world = World(n)
    yield world
    world.close()


@pytest.fixture(scope="module")
def world2():
    yield from _world(2)


@pytest.fixture(scope="module")
def world4():
    yield from _world(4)


@pytest.fixture(scope="module")
def world8():
    yield from _world(8)


@pytest.fixture(scope="module")
def world6():
    yield from _world(6)
