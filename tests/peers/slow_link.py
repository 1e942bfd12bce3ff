#!/usr/bin/env python3
"""A slow TCP link: relays 127.0.0.1:LISTEN to 127.0.0.1:TARGET, passing at most RATE
bytes per second towards the client (the other way at full speed).

Usage: slow_link.py LISTEN TARGET RATE

Used to test what a receiver does while a download is still arriving.
"""
import asyncio
import sys

listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CHUNK = 16384


async def pipe(reader, writer, limit):
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
            if limit:
                await asyncio.sleep(len(data) / limit)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer):
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pipe(client_reader, server_writer, 0),
        pipe(server_reader, client_writer, rate),
    )


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


asyncio.run(main())
