"""Every exported name is documented on the API page."""

import pathlib
import re

from absl.testing import absltest

import jaxsparse as js

API_PAGE = pathlib.Path(__file__).parent.parent / "docs" / "api.md"


class DocsTest(absltest.TestCase):
  def test_every_export_is_on_the_api_page(self):
    text = API_PAGE.read_text()
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)[(`]", text))
    missing = sorted(set(js.__all__) - documented)
    self.assertEmpty(missing, f"add these to docs/api.md: {missing}")

  def test_all_names_exist(self):
    for name in js.__all__:
      self.assertTrue(hasattr(js, name), name)


if __name__ == "__main__":
  absltest.main()
