variable "kubeconfig" {
  description = "Path of the kubeconfig of the cluster to install Caduceus on."
  type        = string
  default     = "~/.kube/config"

  validation {
    condition     = length(trimspace(var.kubeconfig)) > 0
    error_message = "kubeconfig must be a path."
  }
}

variable "kube_context" {
  description = "Context in the kubeconfig. Null: its current context."
  type        = string
  default     = null
}

variable "image_tag" {
  description = "Tag of the operator, trainer and aggregator images. Null: the chart's appVersion."
  type        = string
  default     = null
}

variable "api_server_cidrs" {
  description = "The API server's endpoint addresses as CIDRs, for the operator's NetworkPolicy: kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes -o jsonpath='{.items[*].endpoints[*].addresses[*]}' (each with /32 or /128)."
  type        = list(string)
}
