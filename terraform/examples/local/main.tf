# Caduceus on an existing cluster: the operator, one study namespace and two hospitals, each in its own
# namespace with its data on a PersistentVolumeClaim named "faces" (create the PVCs before the first
# study starts; the module does not manage hospital data). The operator gets Roles, NetworkPolicies and
# admission policies in exactly these three namespaces.
module "caduceus" {
  source = "../../modules/caduceus"

  namespace = "caduceus-system"

  image = { tag = var.image_tag }
  workload_images = {
    trainer    = { tag = var.image_tag }
    aggregator = { tag = var.image_tag }
  }

  # A single-node test cluster (kind, k3d, minikube) usually wants "loopback".
  endpoint_mode          = "service"
  network_policy_enabled = true
  # The only addresses the operator may reach: the API server's endpoints.
  api_server_cidrs = var.api_server_cidrs

  study_namespaces = ["caduceus-studies"]

  hospitals = {
    st-mary = {
      namespace = "hospital-st-mary"
      labels    = { "caduceus.dev/network" = "north" }
      data = {
        claim_name = "faces"
        path       = "/utkface/shard-0"
        format     = "Manifest"
      }
      privacy_budget    = { epsilon = 8, delta = 1e-5 }
      consented_studies = ["caduceus-studies/gender-fedavg", "caduceus-studies/gender-fairfed"]
      trainer = {
        resources = {
          requests = { cpu = "2", memory = "4Gi" }
          limits   = { memory = "6Gi" }
        }
      }
    }
    general = {
      namespace = "hospital-general"
      labels    = { "caduceus.dev/network" = "south" }
      data = {
        claim_name = "faces"
        path       = "/utkface/shard-1"
      }
      privacy_budget    = { epsilon = 4 }
      consented_studies = ["caduceus-studies/gender-fedavg"]
    }
  }
}
