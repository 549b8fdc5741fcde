"""Helpers shared by the tests (fixtures stay in ``tests/conftest.py``, which re-exports the common names).

- ``data``: where the repository, its config and the public sample data lie; the named samples.
- ``dicom_tools``: the external DICOM tools: ``require_tool``, dciodvfy and dsrdump (with the only notices that may
  be ignored), storescu (``storescu``, ``parse_storescu``, ``STORESCU_FLAG``), ``dcmtk_wire_encoding``.
- ``dicom_files``: ``dataset_bytes`` (a file's encoded dataset without its File Meta Information).
- ``sr_tree``: reading SR content trees (``name_of``/``code_of`` as ``(value, scheme)``, ``children``, ``only``,
  ``walk``, ``content_items``, ``sr_text``, ``num``, ``unit_of``).
- ``result_checks``: checks every result object must pass (``assert_not_analysed_sr``, ``our_equipment``).
- ``models``: model directories with and without the pneumoconiosis classifier, and how to install one.
- ``net``: ``free_port``.
- ``node``: ``Node`` (a ``dicom-node serve`` subprocess) and ``open_db``.
- ``postgres``: a throwaway PostgreSQL cluster (``PostgresCluster``), ``Databases`` (new databases of either
  backend) and ``SQLITE_ONLY``; the fixtures ``db_backend``, ``db_url``, ``databases`` are in the conftest.
- ``seeds``: seeded randomness whose seed is printed and replayable ($PNEUMO_TEST_SEED).
"""
