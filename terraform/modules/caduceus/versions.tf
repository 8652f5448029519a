terraform {
  # OpenTofu >= 1.8 (optional() defaults, mock providers in `tofu test`); Terraform >= 1.7 works too.
  required_version = ">= 1.8.0"

  required_providers {
    # The newest versions that the Go module proxy serves, built from source by tools/tofu/build.sh.
    # Only resources and arguments that later versions still have are used (helm_release, kubernetes_namespace).
    helm = {
      source  = "hashicorp/helm"
      version = ">= 1.3.2"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 1.13.4"
    }
  }
}
