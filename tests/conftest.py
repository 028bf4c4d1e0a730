import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def web_demo(tmp_path_factory):
    """The address of one `tokenpacker-web` on the shipped model, for the web tests and the docs' client block."""
    from .web_server import web_server

    with web_server(tmp_path_factory.mktemp("web"), "--max-new-tokens", "8") as url:
        yield url
