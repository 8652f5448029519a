-- Argo CD health of a HospitalClient (fl.caduceus.dev/v1alpha1).
--
-- Reads the conditions the Caduceus operator writes (operator/src/hospital.rs, ledger.rs, study.rs):
--   Ready                  True:  DataClaimBound
--                          False: DataClaimNotFound, DataClaimNotBound ("PersistentVolumeClaim <claim> is <phase>")
--   PrivacyBudgetExhausted True:  BudgetExceeded (the next round would overspend the budget)
--                          False: WithinBudget
--
-- A mirror (sites mode, docs/sites.md: annotation fl.caduceus.dev/mirror-of: site, in the coordinator's
-- --sites-namespace) is written by the coordinator's gateway from its site's SiteHello; it has no data
-- claim in this cluster. Its Ready condition comes from the site:
--   Ready                  True:  the site is connected and reports ready (reason as the coordinator writes it)
--                          False: SiteNotConnected (enrolled, never connected yet: Progressing),
--                                 SiteDisconnected (its stream is gone: Degraded; rounds go on without it),
--                                 SiteNotReady or any other reason (Degraded: the site's admins must act)
-- Messages of a mirror start with "Site: ". PrivacyBudgetExhausted of a mirror is the coordinator's
-- planning copy of the site's ledger; it reads as above.
--
-- Only the Lua base and table libraries are used: Argo CD runs argocd-cm scripts without the
-- string, math, io and os libraries (resource.customizations.useOpenLibs is not needed).
local hs = {}

local function condition(status, conditionType)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition.
local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

-- A message when the status (or the condition) describes an older generation than the spec.
local function staleness(generation, status, c)
  if generation == nil then
    return nil
  end
  local observed = status.observedGeneration
  if observed == nil then
    return "Waiting for the operator to observe generation " .. generation .. " (the status has no observedGeneration)"
  end
  if observed < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the status describes generation " .. observed .. ")"
  end
  if c ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the " .. c.type .. " condition describes generation " .. c.observedGeneration .. ")"
  end
  return nil
end

local function budgetFigures(obj)
  local spent = obj.status.epsilonSpent
  if spent == nil then
    return ""
  end
  local text = "; epsilon spent " .. spent
  if obj.spec ~= nil and obj.spec.privacyBudget ~= nil and obj.spec.privacyBudget.epsilon ~= nil then
    text = text .. " of " .. obj.spec.privacyBudget.epsilon
  end
  if obj.status.epsilonRemaining ~= nil then
    text = text .. ", " .. obj.status.epsilonRemaining .. " remaining"
  end
  return text
end

local mirror = obj.metadata.annotations ~= nil and obj.metadata.annotations["fl.caduceus.dev/mirror-of"] == "site"
-- A mirror's messages say that they describe the site.
local prefix = ""
if mirror then
  prefix = "Site: "
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  if mirror then
    hs.message = "Waiting for the site to connect (a mirror of the site's HospitalClient)"
  else
    hs.message = "Waiting for the operator to check the hospital's data claim"
  end
  return hs
end

local ready = condition(status, "Ready")
local stale = staleness(obj.metadata.generation, status, ready)
if stale ~= nil then
  hs.status = "Progressing"
  hs.message = stale
  return hs
end
if ready == nil then
  hs.status = "Progressing"
  if mirror then
    hs.message = "Waiting for the site to report whether it is ready"
  else
    hs.message = "Waiting for the operator to set the Ready condition"
  end
  return hs
end

if ready.status == "True" then
  local budget = condition(status, "PrivacyBudgetExhausted")
  if budget ~= nil and budget.status == "True" then
    local generation = obj.metadata.generation
    if generation ~= nil and budget.observedGeneration ~= nil and budget.observedGeneration < generation then
      -- The budget was exhausted under an older spec (e.g. before it was raised); the next
      -- admission by a study decides again.
      hs.status = "Healthy"
      hs.message = prefix .. describe(ready) .. budgetFigures(obj) .. "; the privacy budget was exhausted at generation " .. budget.observedGeneration .. " and is checked again when a study next admits this hospital"
      return hs
    end
    hs.status = "Degraded"
    hs.message = prefix .. "PrivacyBudgetExhausted: " .. describe(budget)
    return hs
  end
  hs.status = "Healthy"
  hs.message = prefix .. describe(ready) .. budgetFigures(obj)
  return hs
end

if mirror and ready.status == "False" then
  -- Enrolled but not connected yet: the site agent is starting or dialling.
  if ready.reason == "SiteNotConnected" then
    hs.status = "Progressing"
  else
    -- SiteDisconnected, SiteNotReady and anything else: the site cannot train now.
    hs.status = "Degraded"
  end
  hs.message = prefix .. describe(ready)
  return hs
end

if ready.status == "False" then
  if ready.reason == "DataClaimNotBound" then
    local claim = nil
    if obj.spec ~= nil and obj.spec.data ~= nil then
      claim = obj.spec.data.claimName
    end
    -- A Pending claim may still bind (e.g. WaitForFirstConsumer); a Lost one will not.
    if claim ~= nil and ready.message == "PersistentVolumeClaim " .. claim .. " is Lost" then
      hs.status = "Degraded"
    else
      hs.status = "Progressing"
    end
    hs.message = describe(ready)
    return hs
  end
  -- DataClaimNotFound and anything else: the hospital's admins must act.
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

if ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = prefix .. describe(ready)
  return hs
end

hs.status = "Unknown"
hs.message = prefix .. "Ready condition has an unexpected status " .. tostring(ready.status) .. ": " .. describe(ready)
return hs
