"""The registry's `gcp-storage-emulator`, with the two behaviours of the GCS JSON API that it lacks and that
orbax and the workdir lease rely on, added (run: `python tests/gcs_emulator.py start --port P --in-memory ...`):

- media downloads carry `x-goog-generation` and `x-goog-metageneration` headers: tensorstore's OCDBT reads
  the manifest's generation from them (without: "Malformed StorageGeneration", and no orbax save completes);
- generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`; 0 means "no live object") on
  uploads, downloads, deletes, copies and composes answer 412 when they do not hold, as GCS does.

The emulator serves one request at a time, so a precondition and the write it guards cannot interleave
with another request. Nothing here knows about spcl_jax: it is the public API's documented behaviour.
"""
import functools
import sys
from http import HTTPStatus

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object_name(request):
    params = request.params or {}
    if params.get("object_id"):
        return params["object_id"]
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data  # a multipart upload names its object in its metadata part
    return (data.get("meta") or {}).get("name") if isinstance(data, dict) else None


def _current_generation(request, storage):
    try:
        return str(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
    except (NotFound, KeyError, TypeError):
        return "0"


def _with_preconditions(handler):
    @functools.wraps(handler)
    def checked(request, response, storage, *args, **kwargs):
        match = request.query.get("ifGenerationMatch", [None])[0]
        not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        if match is not None or not_match is not None:
            current = _current_generation(request, storage)
            if (match is not None and match != current) or (not_match is not None and not_match == current):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                         "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return checked


def _with_generation_headers(download):
    @functools.wraps(download)
    def with_headers(request, response, storage, *args, **kwargs):
        result = download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                return result
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return result

    return with_headers


def patch():
    objects.download = _with_generation_headers(objects.download)  # also what objects.get calls for alt=media
    for _, table in server.HANDLERS:
        for method, handler in list(table.items()):
            if handler is not server._health_check:
                table[method] = _with_preconditions(objects.download if handler.__name__ == "download" else handler)


if __name__ == "__main__":
    patch()
    sys.exit(emulator_main.main())
