"""Driving the service's app in process (httpx's ASGI transport): what
`lora-ckpt serve` runs, without a socket."""

import asyncio

import numpy as np


def assert_app_answers_like(app, reference_pool, names, x) -> None:
    """Waits until ``app`` is ready, checks it lists ``names`` in its store and
    answers ``/predict/{name}`` for each image of ``x`` with the logits
    ``reference_pool`` gives (rtol 1e-5)."""
    import httpx

    async def drive():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for _ in range(600):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await client.get("/adapters")).json()["store"] == list(names)
            for name in names:
                want = reference_pool.predict(x, adapter=name)
                for image, row in zip(x, want, strict=True):
                    response = await client.post(
                        f"/predict/{name}", json={"tensor": image.tolist()}
                    )
                    assert response.status_code == 200, response.text
                    np.testing.assert_allclose(response.json()["logits"], row, rtol=1e-5, atol=1e-5)

    asyncio.run(drive())
