{{/* The release's base name, at most 63 characters. */}}
{{- define "caduceus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "caduceus.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "caduceus.labels" -}}
{{ include "caduceus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: caduceus
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "caduceus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "caduceus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. Argument: dict "image" . "root" $ */}}
{{- define "caduceus.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Leader election is on when asked for, and always with more than one replica. */}}
{{- define "caduceus.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves (study namespaces first, each once), comma-separated. */}}
{{- define "caduceus.servedNamespaces" -}}
{{- uniq (concat .Values.namespaces.studies .Values.namespaces.hospitals) | join "," -}}
{{- end -}}

{{/* The operator's user name as the API server sees it. */}}
{{- define "caduceus.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "caduceus.serviceAccountName" .) -}}
{{- end -}}

{{/* Values that the schema cannot check on its own; included by the Deployment, which always renders. */}}
{{- define "caduceus.validate" -}}
{{- if empty .Values.namespaces.studies }}
{{- fail "namespaces.studies is empty: list the namespaces of your FederatedStudies (e.g. --set 'namespaces.studies={caduceus-studies}'); the operator gets Roles and watches Jobs, Secrets and Pods only in the namespaces listed, and they must exist before the install" }}
{{- end }}
{{- if empty .Values.namespaces.hospitals }}
{{- fail "namespaces.hospitals is empty: list the namespaces of your HospitalClients (e.g. --set 'namespaces.hospitals={hospital-st-mary,hospital-riverside}'); the operator gets Roles and watches Jobs, Secrets and Pods only in the namespaces listed, and they must exist before the install" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (empty .Values.networkPolicy.apiServer.cidrs) }}
{{- fail "networkPolicy.apiServer.cidrs is empty: with networkPolicy.enabled the operator may reach only the API server's endpoints; list their addresses as CIDRs (kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes), e.g. --set 'networkPolicy.apiServer.cidrs={10.0.0.10/32}', or set networkPolicy.enabled=false" }}
{{- end }}
{{- /* Only with the cluster's discovery (it lists kinds; `helm template`'s built-in set lists only group/versions). */}}
{{- $discovered := .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration" }}
{{- if and .Values.admissionPolicy.enabled $discovered (not (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy")) }}
{{- fail (printf "admissionPolicy.enabled needs ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1, Kubernetes >= 1.30), which this cluster (%s) does not serve: upgrade it or set admissionPolicy.enabled=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end -}}

{{/* CEL: the metadata at the given path carries app.kubernetes.io/managed-by=caduceus-operator. */}}
{{- define "caduceus.celManaged" -}}
(has({{ . }}.labels) && 'app.kubernetes.io/managed-by' in {{ . }}.labels && {{ . }}.labels['app.kubernetes.io/managed-by'] == 'caduceus-operator')
{{- end -}}
