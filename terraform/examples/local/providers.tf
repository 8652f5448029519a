provider "kubernetes" {
  # Providers of this generation read ~/.kube/config unless told otherwise; only the given file is used.
  load_config_file = true
  config_path      = pathexpand(var.kubeconfig)
  config_context   = var.kube_context
}

provider "helm" {
  kubernetes {
    load_config_file = true
    config_path      = pathexpand(var.kubeconfig)
    config_context   = var.kube_context
  }
}
