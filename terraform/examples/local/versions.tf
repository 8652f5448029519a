terraform {
  required_version = ">= 1.8.0"

  required_providers {
    # Pinned to the versions tools/tofu/build.sh builds (the newest the Go module proxy serves). With
    # helm provider >= 3.0 the `kubernetes` block in providers.tf becomes an attribute (kubernetes = {...}).
    helm = {
      source  = "hashicorp/helm"
      version = "1.3.2"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "1.13.4"
    }
  }
}
